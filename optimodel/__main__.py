"""`python -m optimodel` runs the command line."""

from optimodel.cli.app import main

if __name__ == "__main__":
    main()
