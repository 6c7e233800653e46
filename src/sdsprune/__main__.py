from sdsprune.cli import main

main()
