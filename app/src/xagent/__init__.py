"""xagent sample app."""
