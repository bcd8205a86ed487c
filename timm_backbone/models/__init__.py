"""Model families: the timm wrapper and the native implementations."""
