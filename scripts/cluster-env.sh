# rayline env: sourced by the cluster configs' start commands (and appended to ~/.bashrc).
# shellcheck shell=bash
export PATH="$HOME/venv/bin:$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# The --add-opens flags Spark and RayDP need on Java 17, for every JVM Ray starts on this node
# (Rayline also applies them per session; this covers JVMs started outside a Rayline session).
JDK_JAVA_OPTIONS="$(for p in java.lang java.lang.invoke java.lang.reflect java.io java.net java.nio java.math java.text java.time java.util java.util.concurrent java.util.concurrent.atomic java.util.regex sun.nio.ch sun.nio.cs sun.security.action sun.util.calendar jdk.internal.misc jdk.internal.ref; do printf -- '--add-opens=java.base/%s=ALL-UNNAMED ' "$p"; done)"
export JDK_JAVA_OPTIONS
