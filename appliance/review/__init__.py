"""What inspectors' labels say about the model (issue #14): this package will hold the review queue (the
parts the station sets aside for a person), the labels people give them (`pass` / `fail`), the statistics
computed from those labels (`stats`: detection rate, false-positive rate and agreement with Wilson
intervals, per day, per shift and over the latest labels) and the promotion rule that decides, from the
pessimistic end of those intervals, whether a model has earned production. It sits above `reporting` and
below `runtime`; `stats` is pure (no I/O, no clock)."""
