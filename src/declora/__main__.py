from declora.cli import main

main()
