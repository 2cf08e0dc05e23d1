"""The operator page (/inference): a template and two static files over the JSON API."""
