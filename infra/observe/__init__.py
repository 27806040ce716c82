"""Metrics, SLO alerts and the site view: what each segment's Prometheus scrapes and when it alerts."""
