"""kvpool.operator: the kopf operator that turns a KVCachePool into running workers."""
