"""optc developer tools."""
