"""The local backend (`backend.py`) and the process supervisor it shares with Docker."""
