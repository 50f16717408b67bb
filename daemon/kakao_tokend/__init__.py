"""kakao-tokend: keeps Kakao user OAuth tokens fresh and never loses a rotated refresh token."""

__version__ = "0.1.0"
