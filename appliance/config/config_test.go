package config

import (
	"os"
	"strings"
	"testing"
)

const good = `{"threshold":2,"brokers":[
 {"name":"broker-a","endpoints":["https://10.0.2.2:7441","https://10.0.3.2:7441"]},
 {"name":"broker-b","endpoints":["https://10.0.2.2:7442"]},
 {"name":"broker-c","endpoints":["https://[fd00::1]:7443"]}],
 "ingest":{"port":8443,"addresses":["127.0.0.1"],"repositories":{"population":{"writers":["population-registry"],"readers":[],"quota_bytes":1073741824}}}}`

func TestParseLocalDefault(t *testing.T) {
	f, err := os.Open("../../images/local/config.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	if c.Threshold != 2 || len(c.Brokers) != 3 {
		t.Fatalf("local default is not 2-of-3: %+v", c)
	}
	for name, acc := range c.Ingest.Repositories {
		if acc.QuotaBytes > 512<<20 {
			t.Errorf("repository %s may take %d bytes, more than a test disk holds", name, acc.QuotaBytes)
		}
	}
}

func TestParse(t *testing.T) {
	if _, err := Parse(strings.NewReader(good)); err != nil {
		t.Fatalf("good config rejected: %v", err)
	}
	cases := []struct{ name, in, want string }{
		{"empty", ``, "decode config"},
		{"unknown field", strings.Replace(good, `"threshold"`, `"debug":true,"threshold"`, 1), "unknown field"},
		{"threshold zero", strings.Replace(good, `"threshold":2`, `"threshold":0`, 1), "threshold"},
		{"threshold above n", strings.Replace(good, `"threshold":2`, `"threshold":4`, 1), "threshold"},
		{"trial timeout too short", strings.Replace(good, `"threshold":2`, `"threshold":2,"trial_timeout_seconds":5`, 1), "trial_timeout_seconds"},
		{"trial timeout too long", strings.Replace(good, `"threshold":2`, `"threshold":2,"trial_timeout_seconds":86400`, 1), "trial_timeout_seconds"},
		{"no brokers", `{"threshold":1,"brokers":[],"ingest":{"port":1,"repositories":{"a":{"writers":["w"]}}}}`, "no brokers"},
		{"duplicate name", strings.Replace(good, `broker-b`, `broker-a`, 1), "used twice"},
		{"bad name", strings.Replace(good, `broker-b`, `Broker B`, 1), "name"},
		{"http endpoint", strings.Replace(good, `https://10.0.2.2:7442`, `http://10.0.2.2:7442`, 1), "https"},
		{"no port", strings.Replace(good, `https://10.0.2.2:7442`, `https://10.0.2.2`, 1), "port"},
		{"path", strings.Replace(good, `https://10.0.2.2:7442`, `https://10.0.2.2:7442/x`, 1), "nothing else"},
		{"credentials", strings.Replace(good, `https://10.0.2.2:7442`, `https://u:p@10.0.2.2:7442`, 1), "nothing else"},
		{"port out of range", strings.Replace(good, `7442`, `70000`, 1), "port"},
		{"no endpoints", strings.Replace(good, `["https://10.0.2.2:7442"]`, `[]`, 1), "endpoints"},
		{"trailing", good + `{}`, "trailing"},
		{"ingest port", strings.Replace(good, `"port":8443`, `"port":0`, 1), "ingest port"},
		{"ingest address", strings.Replace(good, `"addresses":["127.0.0.1"]`, `"addresses":["example.com"]`, 1), "not an IP"},
		{"repository name", strings.Replace(good, `"population":{`, `"Pop/../x":{`, 1), "repository name"},
		{"repository name with dot dot", strings.Replace(good, `"population":{`, `"pop..x":{`, 1), "repository name"},
		{"repository name too long", strings.Replace(good, `"population":{`, `"`+strings.Repeat("p", 65)+`":{`, 1), "repository name"},
		{"empty repository name", strings.Replace(good, `"population":{`, `"":{`, 1), "repository name"},
		{"repository without quota", strings.Replace(good, `,"quota_bytes":1073741824`, ``, 1), "quota_bytes 0"},
		{"repository quota below 1 MiB", strings.Replace(good, `1073741824`, `4096`, 1), "quota_bytes 4096"},
		{"repository quota negative", strings.Replace(good, `1073741824`, `-1`, 1), "out of range"},
		{"repository without clients", strings.Replace(good, `"writers":["population-registry"]`, `"writers":[]`, 1), "no client"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse(strings.NewReader(c.in))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error mentioning %q", err, c.want)
			}
		})
	}
}

func TestParseCertBundle(t *testing.T) {
	if _, err := ParseCertBundle(nil); err == nil {
		t.Error("empty bundle accepted")
	}
	if _, err := ParseCertBundle([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")); err == nil || !strings.Contains(err.Error(), "only certificates") {
		t.Errorf("private key in bundle: %v", err)
	}
	if _, err := ParseCertBundle([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")); err == nil {
		t.Error("garbage certificate accepted")
	}
}

func FuzzParse(f *testing.F) {
	f.Add(good)
	f.Fuzz(func(t *testing.T, in string) {
		c, err := Parse(strings.NewReader(in))
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("parsed config does not validate: %v", err)
		}
		if _, err := c.Marshal(); err != nil {
			t.Fatal(err)
		}
	})
}
