"""A user's own LambdaLR factor, referenced from recipes as tests.lr_factors:halve_every."""


def halve_every(t: int, every: float = 3) -> float:
    return 0.5 ** (t // int(every))


def differs_per_rank(t: int) -> float:
    """A deliberately broken factor: each rank computes a different LR (to prove the check fires)."""
    import os

    return 1.0 + int(os.environ.get("RANK", "0"))


def multiplicative_095(t: int) -> float:
    """A MultiplicativeLR factor: the LR shrinks by 5% every step."""
    return 0.95
