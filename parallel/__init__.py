"""moesaic.parallel: parallelism applied from outside onto the single-device model.

- ``ep``: expert parallelism (sharded experts, DeepSpeed MoE groups and tags);
- ``dispatch``: the dropless all-to-all token dispatcher;
- ``portable``: topology-independent checkpoint state (experts by global id, unpartitioned
  optimizer state) and resharded resume.

The submodules import DeepSpeed, so they are imported explicitly, after ``init_distributed``.
"""
