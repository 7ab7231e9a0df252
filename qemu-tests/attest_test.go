package qemutests

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dataembassy/embassy/appliance/logmsg"
	"github.com/dataembassy/embassy/images/build"
)

// TestBootEnrollAndAttest boots a fresh server with the brokers up: it
// brings both NICs up by DHCP, asks to enroll (EK certificate from swtpm's
// CA, credential activation), waits for the operators, and once they have
// approved the enrollment and the image it attests to k brokers.
func TestBootEnrollAndAttest(t *testing.T) {
	requireE2E(t)
	dir := imageDir()
	m := loadImage(t, dir)
	hb := startHostBrokers(t)
	v := startVM(t, bootConfig(t, "enroll", dir, m))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	_, idf := waitMsg(t, ctx, v, 0, logmsg.MsgIdentity)
	id, _ := idf["appliance_id"].(string)
	waitMsg(t, ctx, v, 0, logmsg.MsgEnrollRequested)
	mb, _ := os.ReadFile(filepath.Join(dir, build.ManifestFile))
	sb, _ := os.ReadFile(filepath.Join(dir, build.SignatureFile))
	for _, b := range hb.b {
		if err := b.ApproveEnrollment(id); err != nil {
			t.Fatalf("%s: approve enrollment: %v", b.Name(), err)
		}
		if _, err := b.ApproveManifest(mb, sb); err != nil {
			t.Fatalf("%s: approve image: %v", b.Name(), err)
		}
	}
	_, att := waitMsg(t, ctx, v, 0, logmsg.MsgAttested)
	if n, _ := att["brokers"].(float64); n < 2 {
		t.Fatalf("attested to %v brokers, want at least k=2", att["brokers"])
	}
	if v, _ := att["image_version"].(float64); uint64(v) != m.Version {
		t.Fatalf("attested as image %v, manifest is %d", att["image_version"], m.Version)
	}
	// Each broker that answered recorded the appliance's TPM counters and
	// image.
	attested := 0
	for _, b := range hb.b {
		st, err := b.State()
		if err != nil {
			t.Fatal(err)
		}
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
