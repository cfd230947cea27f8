"""The reverse proxy in front of origins: HTTP/1.1 and WebSocket to clients."""
