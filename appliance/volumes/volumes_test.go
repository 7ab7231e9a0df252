package volumes

import "testing"

func TestPartitionPath(t *testing.T) {
	for in, want := range map[string]string{"/dev/vda": "/dev/vda1", "/dev/sdb": "/dev/sdb1", "/dev/nvme0n1": "/dev/nvme0n1p1"} {
		if got := PartitionPath(in, 1); got != want {
			t.Errorf("PartitionPath(%q) = %q, want %q", in, got, want)
		}
	}
	if got := mappingName("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"); got != "embassy-0f1e2d3c4b5a" {
		t.Errorf("mappingName = %q", got)
	}
}
