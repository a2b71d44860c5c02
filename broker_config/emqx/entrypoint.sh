#!/bin/sh
# Starts an EMQX node in the official image (compose.yaml): writes the
# services' accounts for the bootstrap file named in emqx.conf from the
# environment, then hands over to the image's own entrypoint.
set -eu

data_dir="${EMQX_DATA_DIR:-/opt/emqx/data}"
umask 077
{
    echo "user_id,password,is_superuser"
    echo "kbbus-controller,$KBBUS_MQTT_CONTROLLER_PASSWORD,false"
    echo "kbbus-bridge,$KBBUS_MQTT_BRIDGE_PASSWORD,false"
    echo "kbbus-operator,$KBBUS_MQTT_OPERATOR_PASSWORD,false"
} > "$data_dir/kbbus-services-users.csv"

exec /usr/bin/docker-entrypoint.sh /opt/emqx/bin/emqx foreground
