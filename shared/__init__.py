"""Code both web and worker import: settings, database, jobs, launcher. Imports neither side."""
