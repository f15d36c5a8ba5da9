"""rftjax."""
