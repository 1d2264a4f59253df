import sys

from .cli import main

# not when multiprocessing's spawn imports the main module in the engine process
if __name__ == "__main__":
    sys.exit(main())
