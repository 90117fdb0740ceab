"""The DAV server: HTTPS and HTTP listeners, the WSGI bridge to Radicale, routes, users."""
