package ovmfvars

import (
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Signature types (UEFI 2.10, 32.4.1).
var (
	CertX509   = MustGUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
	CertSHA256 = MustGUID("c1c41626-504c-4092-aca9-41f936934328")
)

// SignatureList encodes one EFI_SIGNATURE_LIST of entries of one type,
// each owned by owner. Entries of a list must all have the same size.
func SignatureList(typ, owner GUID, entries ...[]byte) ([]byte, error) {
	if len(entries) == 0 {
		return nil, errors.New("signature list without entries")
	}
	size := len(entries[0])
	for _, e := range entries {
		if len(e) != size || size == 0 {
			return nil, errors.New("signature list entries differ in size or are empty")
		}
	}
	sigSize := 16 + size
	out := make([]byte, 28, 28+len(entries)*sigSize)
	copy(out[0:16], typ[:])
	binary.LittleEndian.PutUint32(out[16:20], uint32(28+len(entries)*sigSize))
	binary.LittleEndian.PutUint32(out[20:24], 0)
	binary.LittleEndian.PutUint32(out[24:28], uint32(sigSize))
	for _, e := range entries {
		out = append(out, owner[:]...)
		out = append(out, e...)
	}
	return out, nil
}

// SignatureEntry is one entry of a parsed signature list.
type SignatureEntry struct {
	Type, Owner GUID
	Data        []byte
}

// ParseSignatureLists reads a variable's concatenated EFI_SIGNATURE_LISTs.
func ParseSignatureLists(b []byte) ([]SignatureEntry, error) {
	var out []SignatureEntry
	for len(b) > 0 {
		if len(b) < 28 {
			return nil, fmt.Errorf("%w: signature list header of %d bytes", ErrFormat, len(b))
		}
		typ := GUID(b[0:16])
		listSize := int(binary.LittleEndian.Uint32(b[16:20]))
		hdrSize := int(binary.LittleEndian.Uint32(b[20:24]))
		sigSize := int(binary.LittleEndian.Uint32(b[24:28]))
		if listSize < 28 || listSize > len(b) || hdrSize < 0 || hdrSize > listSize-28 || sigSize <= 16 || (listSize-28-hdrSize)%sigSize != 0 {
			return nil, fmt.Errorf("%w: signature list sizes %d/%d/%d", ErrFormat, listSize, hdrSize, sigSize)
		}
		for off := 28 + hdrSize; off < listSize; off += sigSize {
			out = append(out, SignatureEntry{Type: typ, Owner: GUID(b[off : off+16]), Data: b[off+16 : off+sigSize]})
		}
		b = b[listSize:]
	}
	return out, nil
}

// SecureBootKeys are the certificates a VARS image enrolls: the platform
// key, the key-exchange key and the signature database (the certificate
// that signs the UKI).
type SecureBootKeys struct {
	PK, KEK, DB *x509.Certificate
	// DBX are SHA-256 digests of images that must never run (may be empty).
	DBX [][32]byte
	// Owner is the signature owner GUID recorded with each entry.
	Owner GUID
}

// SecureBootVariables returns the variables that enroll keys and turn
// Secure Boot on in OVMF: PK, KEK, db (and dbx if any) as time-based
// authenticated variables stamped at, SecureBootEnable = 1 and
// CustomMode = 0. With a PK present the firmware leaves setup mode and
// enforces db at the next boot.
func SecureBootVariables(k SecureBootKeys, at time.Time) ([]Variable, error) {
	if k.PK == nil || k.KEK == nil || k.DB == nil {
		return nil, errors.New("secure boot needs a PK, a KEK and a db certificate")
	}
	authAttrs := NonVolatile | BootserviceAccess | RuntimeAccess | TimeBasedAuthenticatedWriteAccess
	var vars []Variable
	for _, e := range []struct {
		name   string
		vendor GUID
		cert   *x509.Certificate
	}{{"PK", GlobalVariable, k.PK}, {"KEK", GlobalVariable, k.KEK}, {"db", ImageSecurityDatabase, k.DB}} {
		list, err := SignatureList(CertX509, k.Owner, e.cert.Raw)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", e.name, err)
		}
		vars = append(vars, Variable{Name: e.name, Vendor: e.vendor, Attributes: authAttrs, Timestamp: at.UTC(), Data: list})
	}
	if len(k.DBX) > 0 {
		entries := make([][]byte, len(k.DBX))
		for i := range k.DBX {
			entries[i] = k.DBX[i][:]
		}
		list, err := SignatureList(CertSHA256, k.Owner, entries...)
		if err != nil {
			return nil, fmt.Errorf("dbx: %w", err)
		}
		vars = append(vars, Variable{Name: "dbx", Vendor: ImageSecurityDatabase, Attributes: authAttrs, Timestamp: at.UTC(), Data: list})
	}
	vars = append(vars,
		Variable{Name: "SecureBootEnable", Vendor: SecureBootEnableDisable, Attributes: NonVolatile | BootserviceAccess, Data: []byte{1}},
		Variable{Name: "CustomMode", Vendor: CustomModeEnable, Attributes: NonVolatile | BootserviceAccess, Data: []byte{0}},
	)
	return vars, nil
}
