"""`python -m moeify` (also what `accelerate launch -m moeify` runs)."""

from moeify.cli import main

if __name__ == "__main__":
    main()
