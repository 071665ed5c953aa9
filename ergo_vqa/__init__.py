"""ERGO command line, embedded demo and offline model building."""
