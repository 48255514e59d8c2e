"""``konnectivity-fast demo``: the real proxy-server and proxy-agent programs at work.

It starts, as processes, two proxy-servers (one per frontend mode), a load balancer in
front of their agent ports, two proxy-agents that each hold both servers through it, and
a backend standing in for a kubelet; makes a throwaway CA and mTLS certificates for them;
then plays kube-apiserver, carrying real requests through both frontends, and prints what
a person wants to see: processes and ports, tunnel set-up times, round trips and
throughput, which server and agents carried the tunnels, health, and the programs' own
counters. Then it stops everything, or leaves it running with ``--keep``.

Modules: ``command`` (the command line), ``run`` (the sequence), ``layout`` (what runs
where), ``netns`` (the remote topology's namespaces), ``pki``, ``procs``, ``tunnels`` and
``traffic`` (the frontend clients and what they measure), ``observe`` (health and
metrics), ``report`` (output), and the two helper programs ``backend`` and ``balancer``.
"""
