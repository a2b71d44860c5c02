#!/bin/sh
# Starts Mosquitto in the official image (compose.yaml): writes the services'
# password file from the environment, keeps the agents' one, then execs the
# broker. Passwords never sit in the repository or the image.
set -eu

config_dir="${MOSQUITTO_CONFIG_DIR:-/mosquitto/config}"
data_dir="${MOSQUITTO_DATA_DIR:-/mosquitto/data}"
umask 077

# Rebuilt at every start, so a changed password in the environment wins.
services="$data_dir/services.passwd"
rm -f "$services"
touch "$services"
mosquitto_passwd -b "$services" kbbus-controller "$KBBUS_MQTT_CONTROLLER_PASSWORD"
mosquitto_passwd -b "$services" kbbus-bridge "$KBBUS_MQTT_BRIDGE_PASSWORD"
mosquitto_passwd -b "$services" kbbus-operator "$KBBUS_MQTT_OPERATOR_PASSWORD"

# One account per MQTT agent (username = client id = agent id), added by the
# operator and kept in the volume across restarts:
#   docker compose exec mosquitto mosquitto_passwd -b \
#       /mosquitto/data/agents.passwd <agent-id> <password>
#   docker compose kill -s HUP mosquitto
touch "$data_dir/agents.passwd"

# Mosquitto drops from root to its own user and must still read them.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$data_dir" "$services" "$data_dir/agents.passwd"
fi

exec mosquitto -c "$config_dir/mosquitto.conf"
