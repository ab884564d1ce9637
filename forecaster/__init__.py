"""Global neural forecasters (RNN, LSTM, GRU, TCN, Transformer, hybrid) as sktime estimators."""

from forecaster.estimators import (
    GRUForecaster,
    HybridForecaster,
    LSTMForecaster,
    NeuralForecaster,
    RNNForecaster,
    TCNForecaster,
    TransformerForecaster,
)

__all__ = [
    "GRUForecaster",
    "HybridForecaster",
    "LSTMForecaster",
    "NeuralForecaster",
    "RNNForecaster",
    "TCNForecaster",
    "TransformerForecaster",
]
