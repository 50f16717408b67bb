"""`python -m kakao_tokend`: the same as the `kakao-tokend` command."""

from .cli import main

if __name__ == "__main__":
    main()
