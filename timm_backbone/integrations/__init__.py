"""Optional integrations with other libraries; each module imports its library, the package never imports them."""
