"""How the flows are deployed: schedules, parameters and the serve entry point."""
