"""weir_operator: the kopf operator that reconciles StreamJob resources into runtime workers."""
