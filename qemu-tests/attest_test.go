package qemutests

import (
	"testing"

	"github.com/dataembassy/embassy/appliance/logmsg"
)

// TestBootEnrollAndAttest: a fresh server, with the brokers up, brings both
// NICs up by DHCP, asks to enroll (EK certificate from swtpm's CA,
// credential activation), waits for the operators, and once they have
// approved the enrollment and the image it attests to k brokers, which
// record its image. It reads the first boot of the provisioned embassy's
// twin-a, which is that boot: makeEmbassy approves only after both
// appliances asked to enroll.
func TestBootEnrollAndAttest(t *testing.T) {
	at := provisionedEmbassy(t)
	m := loadImage(t, imageDir())
	console := at.firstBoot.consoles[twinNames[0]]
	for _, nic := range []string{"eth0", "eth1"} {
		if !consoleHas(console, logmsg.MsgNetworkUp, "interface", nic) {
			t.Fatalf("%s never came up by DHCP on the first boot", nic)
		}
	}
	idf, _ := consoleMsg(t, console, logmsg.MsgIdentity)
	id, _ := idf["appliance_id"].(string)
	if id == "" || id != at.ids[twinNames[0]] {
		t.Fatalf("first boot identity %v, brokers enrolled %q", idf, at.ids[twinNames[0]])
	}
	_, asked := consoleMsg(t, console, logmsg.MsgEnrollRequested)
	att, attestedAt := consoleMsg(t, console, logmsg.MsgAttested)
	if !asked.Before(at.firstBoot.approved) || attestedAt.Before(at.firstBoot.approved) {
		t.Fatalf("enrollment asked %s, operators approved %s, attested %s: the appliance did not wait for the operators",
			asked.Format("15:04:05.000"), at.firstBoot.approved.Format("15:04:05.000"), attestedAt.Format("15:04:05.000"))
	}
	if n, _ := att["brokers"].(float64); n < 2 {
		t.Fatalf("attested to %v brokers, want at least k=2", att["brokers"])
	}
	if v, _ := att["image_version"].(float64); uint64(v) != m.Version {
		t.Fatalf("attested as image %v, manifest is %d", att["image_version"], m.Version)
	}
	// Each broker that answered recorded the appliance's image.
	attested := 0
	for _, st := range at.firstBoot.brokers {
		for _, a := range st.Appliances {
			if a.ID == id && a.LastImage == m.Version {
				attested++
			}
		}
	}
	if attested < 2 {
		t.Fatalf("%d brokers recorded an attestation", attested)
	}
}
