"""Architecture values (config.json) of Hub models, so `qlora-pipeline plan` works offline. Named OWNER--NAME.json."""
