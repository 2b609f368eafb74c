"""Synthetic card transactions with realistic class imbalance and a drift knob.

``drift`` in [0, 1] moves both the inputs (covariate drift: larger amounts, more
online and foreign transactions) and the label mechanism (concept drift: fraud
shifts from night-time card-present to daytime online purchases).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

CATEGORIES = ["grocery", "restaurant", "travel", "electronics", "fuel", "online", "entertainment", "health"]
COUNTRIES = ["US", "CA", "GB", "DE", "FR", "BR", "IN", "NG"]
CHANNELS = ["pos", "online", "atm"]


def generate_day(day: date, rows: int, seed: int, drift: float = 0.0) -> Any:
    """One day of transactions as a polars DataFrame; the same (day, rows, seed, drift) gives the same data."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng([seed, day.toordinal(), int(round(drift * 1000))])
    n = rows
    cat_p = np.array([0.25, 0.15, 0.05, 0.08, 0.12, 0.2, 0.1, 0.05])
    cat_p = (1 - drift) * cat_p + drift * np.array([0.1, 0.1, 0.1, 0.25, 0.05, 0.3, 0.05, 0.05])
    country_p = np.array([0.6, 0.08, 0.08, 0.07, 0.06, 0.04, 0.04, 0.03])
    country_p = (1 - drift) * country_p + drift * np.array([0.3, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.15])
    channel_p = (1 - drift) * np.array([0.6, 0.3, 0.1]) + drift * np.array([0.3, 0.6, 0.1])

    category = rng.choice(len(CATEGORIES), size=n, p=cat_p / cat_p.sum())
    country = rng.choice(len(COUNTRIES), size=n, p=country_p / country_p.sum())
    channel = rng.choice(len(CHANNELS), size=n, p=channel_p / channel_p.sum())
    amount = np.round(np.minimum(rng.lognormal(3.5 + 0.8 * drift, 1.1 + 0.3 * drift, n), 49_999.0), 2)
    seconds = np.sort(rng.integers(0, 86_400, n))
    hour = seconds // 3600
    card_present = (channel != 1) & (rng.random(n) > 0.05)
    age = rng.integers(18, 91, n).astype(float)
    age[rng.random(n) < 0.05] = np.nan
    distance = np.round(rng.exponential(15.0 + 40.0 * drift, n), 2)
    distance[rng.random(n) < 0.08] = np.nan
    velocity = rng.poisson(2.0 + 2.0 * drift, n)

    night = (hour < 6).astype(float)
    online = (channel == 1).astype(float)
    foreign = (country != 0).astype(float)
    dist = np.nan_to_num(distance, nan=15.0)
    old_logit = -5.6 + 0.9 * np.log1p(amount) / 3 + 1.4 * night + 0.8 * foreign + 0.012 * dist + 0.15 * velocity
    new_logit = -5.6 + 0.9 * np.log1p(amount) / 3 + 1.6 * online * (1 - night) + 0.5 * foreign + 0.2 * velocity
    logit = (1 - drift) * old_logit + drift * new_logit - 0.4 * (category == 0)
    is_fraud = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)

    start = datetime(day.year, day.month, day.day)
    return pl.DataFrame(
        {
            "txn_id": [f"{day.isoformat()}-{i:07d}" for i in range(n)],
            "ts": [start + timedelta(seconds=int(s)) for s in seconds],
            "amount": amount,
            "merchant_category": np.array(CATEGORIES)[category],
            "country": np.array(COUNTRIES)[country],
            "channel": np.array(CHANNELS)[channel],
            "card_present": card_present,
            "customer_age": pl.Series(age).cast(pl.Int64, strict=False),
            "distance_from_home_km": distance,
            "txns_last_24h": velocity.astype(np.int64),
            "is_fraud": is_fraud,
        }
    ).with_columns(pl.col("distance_from_home_km").fill_nan(None))
