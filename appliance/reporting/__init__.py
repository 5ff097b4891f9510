"""Where inspections and events go, and the station's voice: the fan-out over sinks (`fanout`), the results
log sink and store (`results_sink`, `results_log`), the MQTT sink, outbox and link (`mqtt_sink`, `outbox`,
`mqtt_link`), per-store writers with bounded backlogs (`recorder`, `sqlite_store`), the storage watch
(`storage_watch`: fail-safe on a full backlog), heartbeats (`heartbeat`), the birth (`presence`), commands
(`commands`) and the MQTT payload contract (`payloads`)."""
