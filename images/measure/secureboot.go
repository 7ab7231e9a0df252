package measure

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"unicode/utf16"

	"github.com/dataembassy/embassy/images/ovmfvars"
)

// VariableEvent returns the digest of a UEFI_VARIABLE_DATA event, as the
// firmware logs a variable into PCR7 (EV_EFI_VARIABLE_DRIVER_CONFIG, and
// EV_EFI_VARIABLE_AUTHORITY for the entry that verified an image): vendor
// GUID, name length in characters and data length (both 64-bit), the
// UTF-16LE name without its NUL, the data.
func VariableEvent(vendor ovmfvars.GUID, name string, data []byte) [32]byte {
	units := utf16.Encode([]rune(name))
	b := make([]byte, 0, 32+2*len(units)+len(data))
	b = append(b, vendor[:]...)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(units)))
	b = binary.LittleEndian.AppendUint64(b, uint64(len(data)))
	for _, u := range units {
		b = binary.LittleEndian.AppendUint16(b, u)
	}
	b = append(b, data...)
	return sha256.Sum256(b)
}

// Separator is the digest of the EV_SEPARATOR event that ends the
// pre-OS measurements of a PCR.
var Separator = sha256.Sum256([]byte{0, 0, 0, 0})

// SecureBoot predicts PCR7's events, in log order, on firmware that has
// Secure Boot on with the keys of k enrolled exactly as
// ovmfvars.SecureBootVariables enrolls them, and that boots one image
// signed by k.DB: the SecureBoot, PK, KEK, db and dbx variables, the
// separator, and the db certificate as the authority that verified the
// image (its EFI_SIGNATURE_DATA: owner GUID, then the certificate).
func SecureBoot(k ovmfvars.SecureBootKeys) ([][32]byte, error) {
	if k.PK == nil || k.KEK == nil || k.DB == nil {
		return nil, fmt.Errorf("secure boot prediction needs a PK, a KEK and a db certificate")
	}
	lists := map[string][]byte{}
	for name, c := range map[string][]byte{"PK": k.PK.Raw, "KEK": k.KEK.Raw, "db": k.DB.Raw} {
		l, err := ovmfvars.SignatureList(ovmfvars.CertX509, k.Owner, c)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		lists[name] = l
	}
	if len(k.DBX) > 0 {
		entries := make([][]byte, len(k.DBX))
		for i := range k.DBX {
			entries[i] = k.DBX[i][:]
		}
		l, err := ovmfvars.SignatureList(ovmfvars.CertSHA256, k.Owner, entries...)
		if err != nil {
			return nil, fmt.Errorf("dbx: %w", err)
		}
		lists["dbx"] = l
	}
	authority := append(append([]byte(nil), k.Owner[:]...), k.DB.Raw...)
	return [][32]byte{
		VariableEvent(ovmfvars.GlobalVariable, "SecureBoot", []byte{1}),
		VariableEvent(ovmfvars.GlobalVariable, "PK", lists["PK"]),
		VariableEvent(ovmfvars.GlobalVariable, "KEK", lists["KEK"]),
		VariableEvent(ovmfvars.ImageSecurityDatabase, "db", lists["db"]),
		VariableEvent(ovmfvars.ImageSecurityDatabase, "dbx", lists["dbx"]),
		Separator,
		VariableEvent(ovmfvars.ImageSecurityDatabase, "db", authority),
	}, nil
}
