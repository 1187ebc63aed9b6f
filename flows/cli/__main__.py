"""`python -m flows.cli`: the `aemnist` command."""

from flows.cli import entry

if __name__ == "__main__":
    entry()
