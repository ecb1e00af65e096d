from forgetpatch.cli import main

main()
