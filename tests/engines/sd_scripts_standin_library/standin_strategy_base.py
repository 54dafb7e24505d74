"""Stand-in for library/strategy_base.py: the caching strategy slot the dataset reads."""


class LatentsCachingStrategy:
    _strategy = None

    @classmethod
    def set_strategy(cls, strategy) -> None:
        if cls._strategy is not None:
            raise RuntimeError("Internal error. LatentsCachingStrategy strategy is already set")
        cls._strategy = strategy
