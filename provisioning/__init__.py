"""Provisioning: a flashed Jetson -> a station. `python -m provisioning` renders a station's config and systemd
unit (render.py, templates/), install-jetpack6.sh installs the software, mosquitto/ holds a broker setup."""
