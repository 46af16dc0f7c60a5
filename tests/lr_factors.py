"""A user's own LambdaLR factor, referenced from recipes as tests.lr_factors:halve_every."""


def halve_every(t: int, every: float = 3) -> float:
    return 0.5 ** (t // int(every))
