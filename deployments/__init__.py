"""How the study runs in production: deployments, servers, work pool and worker."""
