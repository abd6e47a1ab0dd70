"""Tests for the service (app/)."""
