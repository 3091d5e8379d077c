"""Flags and environment variables -> Config: precedence, validation, derived values."""
from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from portainer_agent.config import Config
from portainer_agent.options import OPTIONS, AgentOptions, build_config, derive_cluster_key

from .tempdirs import temp_dir

#: For every option: a value its parser refuses.
BAD_VALUES = {
    "host": "not-an-ip",
    "port": "90o1",
    "ports-file": "relative/ports.json",
    "docker-host": "tcp://127.0.0.1:2375",
    "data-dir": "",
    "tls-cert": "/nonexistent/cert.pem",
    "tls-key": "/nonexistent/key.pem",
    "tls-ca": "/nonexistent/ca.pem",
    "healthcheck-cert": "/nonexistent/client.pem",
    "healthcheck-key": "/nonexistent/client.key",
    "keep-cert": "maybe",
    "log-level": "verbose",
    "log-format": "xml",
    "shutdown-grace": "5",
    "secret": "",
    "secret-timeout": "3 days",
    "cluster-addr": "",
    "advertise-addr": "node-1.example",
    "cluster-port": "70000",
    "cluster-key": "",
    "probe-interval": "0s",
    "probe-timeout": "-1s",
    "peer-timeout": "0",
    "peer-response-timeout": "soon",
    "aggregate-timeout": "soon",
    "aggregate-max-bytes": "lots",
    "list-cache": "sometimes",
    "list-cache-max-bytes": "0",
    "identity-refresh": "0s",
    "host-management": "2",
    "volumes-root": "relative/volumes",
    "host-root": "host",
    "console-ping": "1 minute",
    "metrics-addr": "9003",
    "tls-handshake-timeout": "0s",
    "header-timeout": "0s",
    "idle-timeout": "soon",
    "max-connections": "0",
    "browse-max-upload": "10X",
}


class BuildConfigTests(SynchronousTestCase):
    def test_nothing_given_is_the_default_config(self) -> None:
        self.assertEqual(build_config({}, {}), Config())

    def test_every_option_has_a_bad_value_in_this_table(self) -> None:
        self.assertEqual(set(BAD_VALUES), {spec.flag for spec in OPTIONS})

    def test_browse_max_upload_takes_bytes_or_a_binary_unit(self) -> None:
        for text, expected in (("0", 0), ("1048576", 1 << 20), ("512M", 512 << 20), ("10G", 10 << 30),
                               ("1GiB", 1 << 30), ("2k", 2048)):
            self.assertEqual(build_config({}, {"AGENT_BROWSE_MAX_UPLOAD": text}).browse_max_upload, expected, text)
        self.assertEqual(build_config({}, {}).browse_max_upload, 0)
        for bad in ("-1", "1.5G", "G", ""):
            self.assertRaises(usage.UsageError, build_config, {"browse-max-upload": bad}, {})

    def test_environment_is_used_when_the_flag_is_absent(self) -> None:
        config = build_config({"port": None}, {"AGENT_PORT": "9101", "AGENT_HOST": "127.0.0.1", "LOG_LEVEL": "debug",
                                               "DOCKER_HOST": "unix:///run/d.sock", "CAP_HOST_MANAGEMENT": "1"})
        self.assertEqual((config.port, config.host, config.log_level, config.docker_host, config.host_management),
                         (9101, "127.0.0.1", "DEBUG", "unix:///run/d.sock", True))
        self.assertEqual(config.docker_socket_path, "/run/d.sock")

    def test_flag_wins_over_environment(self) -> None:
        config = build_config({"port": "9200", "log-format": "json"}, {"AGENT_PORT": "9101", "LOG_FORMAT": "text"})
        self.assertEqual((config.port, config.log_format), (9200, "json"))

    def test_flag_wins_even_over_an_invalid_environment_value(self) -> None:
        self.assertEqual(build_config({"port": "9200"}, {"AGENT_PORT": "nope"}).port, 9200)

    def test_each_bad_flag_is_a_usage_error_naming_the_flag(self) -> None:
        for spec in OPTIONS:
            error = self.assertRaises(usage.UsageError, build_config, {spec.flag: BAD_VALUES[spec.flag]}, {})
            self.assertIn(f"--{spec.flag}", str(error), spec.flag)
            self.assertNotIn("\n", str(error))

    def test_each_bad_environment_value_is_a_usage_error_naming_the_variable(self) -> None:
        for spec in OPTIONS:
            bad = BAD_VALUES[spec.flag]
            if bad == "":
                continue  # an empty variable counts as unset (next test)
            error = self.assertRaises(usage.UsageError, build_config, {}, {spec.env: bad})
            self.assertIn(spec.env, str(error), spec.flag)

    def test_empty_environment_values_count_as_unset(self) -> None:
        environ = {spec.env: "" for spec in OPTIONS}
        self.assertEqual(build_config({}, environ), Config())

    def test_port_range(self) -> None:
        for bad in ("65536", "-1", "1.5", ""):
            self.assertRaises(usage.UsageError, build_config, {"port": bad}, {})
        self.assertEqual(build_config({"port": "1"}, {}).port, 1)
        self.assertEqual(build_config({"port": "65535"}, {}).port, 65535)

    def test_port_0_asks_for_a_free_port_on_every_listener(self) -> None:
        config = build_config({"port": "0", "cluster-port": "0", "metrics-addr": "127.0.0.1:0",
                               "ports-file": "/run/agent/ports.json"}, {})
        self.assertEqual((config.port, config.cluster_port, config.metrics_addr), (0, 0, ("127.0.0.1", 0)))
        self.assertEqual(str(config.ports_file), "/run/agent/ports.json")

    def test_log_level_any_case(self) -> None:
        for given, expected in (("debug", "DEBUG"), ("Info", "INFO"), ("warn", "WARN"), ("WARNING", "WARN"),
                                (" error ", "ERROR")):
            self.assertEqual(build_config({}, {"LOG_LEVEL": given}).log_level, expected, given)
            self.assertEqual(build_config({"log-level": given}, {}).log_level, expected, given)

    def test_durations(self) -> None:
        config = build_config(
            {"shutdown-grace": "1m30s", "probe-interval": "250ms"},
            {"AGENT_SECRET_TIMEOUT": "0", "AGENT_CLUSTER_PROBE_TIMEOUT": "1.5s"},
        )
        self.assertEqual((config.shutdown_grace, config.probe_interval, config.secret_timeout, config.probe_timeout),
                         (90.0, 0.25, 0.0, 1.5))

    def test_zero_probe_interval_is_refused(self) -> None:
        error = self.assertRaises(usage.UsageError, build_config, {}, {"AGENT_CLUSTER_PROBE_INTERVAL": "0"})
        self.assertIn("AGENT_CLUSTER_PROBE_INTERVAL", str(error))

    def test_ip_options_are_normalised(self) -> None:
        config = build_config({"advertise-addr": " 10.0.0.7 ", "host": "::0"}, {})
        self.assertEqual((config.advertise_addr, config.host), ("10.0.0.7", "::"))

    def test_flags_as_booleans(self) -> None:
        for text, value in (("1", True), ("true", True), ("YES", True), ("0", False), ("off", False)):
            self.assertEqual(build_config({"keep-cert": text}, {}).keep_cert, value, text)
        self.assertFalse(build_config({}, {"AGENT_TLS_KEEP_CERT": ""}).keep_cert)


class TLSPairingTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = temp_dir(self)
        self.cert, self.key = directory / "cert.pem", directory / "key.pem"
        self.cert.write_bytes(b"cert")
        self.key.write_bytes(b"key")

    def test_cert_and_key_together(self) -> None:
        config = build_config({"tls-cert": str(self.cert)}, {"AGENT_TLS_KEY": str(self.key)})
        self.assertEqual((config.tls_cert, config.tls_key), (self.cert, self.key))

    def test_cert_without_key_is_refused(self) -> None:
        error = self.assertRaises(usage.UsageError, build_config, {"tls-cert": str(self.cert)}, {})
        self.assertIn("--tls-key", str(error))

    def test_key_without_cert_is_refused(self) -> None:
        error = self.assertRaises(usage.UsageError, build_config, {}, {"AGENT_TLS_KEY": str(self.key)})
        self.assertIn("--tls-cert", str(error))

    def test_healthcheck_client_certificate_and_key_together(self) -> None:
        config = build_config({"healthcheck-cert": str(self.cert)}, {"AGENT_HEALTHCHECK_KEY": str(self.key)})
        self.assertEqual((config.healthcheck_cert, config.healthcheck_key), (self.cert, self.key))
        error = self.assertRaises(usage.UsageError, build_config, {}, {"AGENT_HEALTHCHECK_CERT": str(self.cert)})
        self.assertIn("--healthcheck-key", str(error))

    def test_directory_is_not_a_certificate(self) -> None:
        error = self.assertRaises(usage.UsageError, build_config,
                                  {"tls-cert": str(self.cert.parent), "tls-key": str(self.key)}, {})
        self.assertIn("--tls-cert", str(error))


class ClusterKeyTests(SynchronousTestCase):
    def test_derived_from_the_secret(self) -> None:
        config = build_config({}, {"AGENT_SECRET": "s3cret"})
        self.assertEqual(config.cluster_key, derive_cluster_key("s3cret"))
        self.assertIsInstance(config.cluster_key, bytes)
        self.assertNotIn(b"s3cret", config.cluster_key)

    def test_derivation_is_deterministic_and_secret_dependent(self) -> None:
        self.assertEqual(derive_cluster_key("a"), derive_cluster_key("a"))
        self.assertNotEqual(derive_cluster_key("a"), derive_cluster_key("b"))
        self.assertGreaterEqual(len(derive_cluster_key("a")), 32)

    def test_explicit_key_wins_over_the_derived_one(self) -> None:
        config = build_config({"cluster-key": "explicit"}, {"AGENT_SECRET": "s3cret"})
        self.assertEqual(config.cluster_key, b"explicit")

    def test_no_secret_no_key(self) -> None:
        self.assertIsNone(build_config({}, {}).cluster_key)


class AgentOptionsTests(SynchronousTestCase):
    def test_parse_reads_the_given_environment(self) -> None:
        options = AgentOptions(environ={"AGENT_PORT": "9301", "LOG_LEVEL": "warn"})
        options.parseOptions(["--log-level", "error"])
        assert options.config is not None
        self.assertEqual((options.config.port, options.config.log_level), (9301, "ERROR"))

    def test_bad_flag_value_is_a_usage_error(self) -> None:
        options = AgentOptions(environ={})
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--port", "x"])
        self.assertIn("--port", str(error))

    def test_bad_environment_value_is_a_usage_error(self) -> None:
        options = AgentOptions(environ={"LOG_FORMAT": "yaml"})
        error = self.assertRaises(usage.UsageError, options.parseOptions, [])
        self.assertIn("LOG_FORMAT", str(error))

    def test_unknown_flag_is_a_usage_error(self) -> None:
        self.assertRaises(usage.UsageError, AgentOptions(environ={}).parseOptions, ["--no-such-flag"])

    def test_help_names_every_environment_variable(self) -> None:
        text = str(AgentOptions(environ={}))
        for spec in OPTIONS:
            self.assertIn(f"--{spec.flag}", text)
            self.assertIn(spec.env, text)
