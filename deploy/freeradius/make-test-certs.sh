#!/bin/sh
# A throw-away CA and certificates for a first try of EAP (PEAP, EAP-TTLS)
# and RadSec.  Production brings its own: a server certificate the
# supplicants are configured to trust, by a CA you control.
#
#   make-test-certs.sh DIR [SERVER_NAME] [CLIENT_NAME ...]
#
# DIR/ca.pem ca.key              the test CA (10 years, EC P-256)
# DIR/server.pem server.key      SERVER_NAME (default radius.test): serverAuth
#                                (Windows supplicants want the
#                                1.3.6.1.5.5.7.3.1 extended key usage)
# DIR/CLIENT.pem CLIENT.key      each CLIENT_NAME: clientAuth, for a RadSec
#                                client (a NAS or radsecproxy)
set -eu
dir=${1:?usage: make-test-certs.sh DIR [SERVER_NAME] [CLIENT_NAME ...]}
server=${2:-radius.test}
[ $# -ge 2 ] && shift 2 || shift $#
mkdir -p "$dir"
cd "$dir"
umask 077

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout ca.key -out ca.pem -days 3650 -subj "/CN=billcore test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # name eku
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\nsubjectAltName=DNS:%s\n' \
        "$2" "$1" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" -days 825 \
        -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

issue "$server" serverAuth
mv "$server.pem" server.pem
mv "$server.key" server.key
for client in "$@"; do
    issue "$client" clientAuth
done
chmod 644 ca.pem server.pem
echo "made in $dir: ca.pem server.pem server.key${*:+ and $*}"
