"""ShardedShampoo inside the frameworks users train with. Each module imports its framework,
an optional extra: import the one you use (``sharded_shampoo.integrations.torchtitan``)."""
