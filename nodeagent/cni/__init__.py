"""The chained CNI plugin ``trellis-cni``: its installer and the agent's side of it.

The plugin that runs on the host is a small static C program
(``plugin/trellis_cni.c``, built by ``make setup`` into ``build/cni/`` and by the
image into ``/opt/trellis/``): the host needs no interpreter. It forwards each
call to the node agent, which reads it with ``spec.py`` and answers
(``nodeagent/cni_server.py``); ``protocol.py`` is the wire between the two,
``fallback.py`` what the plugin does while no agent runs, ``install.py`` keeps
it chained into the node's CNI configuration.
"""
