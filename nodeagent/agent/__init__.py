"""The daemon shell: enrollment, the workload registry, the capture
reconciler, the enrollment socket, admin/readiness/metrics servers, systemd
notify and the composition root ``Agent`` (see ``nodeagent.agent.agent``)."""
