"""What the tests share, in one place (not test modules: pytest collects nothing here).

- `settings.py`: `station_settings()`, the one factory of a test station's settings (bundle, camera source or
  frames folder, data dir, MQTT port or MQTT off, station id, extra sections merged); `SITE`, `LINE`, `STATION_ID`.
- `frames.py`: `write_frames()`, the one writer of a folder of synthetic part images (optionally one undecodable
  file); `write_part()` for a single image; `NOT_A_PNG`.
- `mqtt.py`: a control room (`Subscriber`), `prefix()`, `rejections()`, the real `mosquitto_pub`, a station in
  this process (`start_station`, `trigger_parts`, `stop_station`), `needs_mosquitto`, `refused_port()` and
  `broker_with_config()` (ports without a race).
- `waiting.py`: `wait_until(predicate, timeout)`, the single synchronisation helper (polling with a deadline).
- `pki.py`: a throw-away CA and certificates (`make_test_pki`), Mosquitto password files (`write_password_file`).

The broker itself (`MosquittoBroker`, `free_port`, `TlsFiles`, `find_mosquitto`) stays in `tools/broker.py`:
`make demo` and `make bench` start one too. Fixtures (`broker`, `control_room`, `refused_port`, the session's
bundle) are in `tests/conftest.py`.
"""
