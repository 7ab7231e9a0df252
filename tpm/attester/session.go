package attester

import (
	"errors"
	"fmt"
	"sort"

	tpmclient "github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpmutil"
)

// ErrNoPCRPolicy is returned for a sealed blob that any software on this
// TPM could open: the brokers always seal to a PCR policy, so a blob
// without one is refused rather than unsealed.
var ErrNoPCRPolicy = errors.New("sealed blob has no PCR policy")

// The commands that return a secret (TPM2_Unseal of a share,
// TPM2_ActivateCredential) carry one more session: an HMAC session salted
// to the EK (the salt is encrypted to the EK's public key, so only this
// TPM and this process learn the session key) with AES-128-CFB encryption
// of the response's first parameter. A probe on the TPM's bus (LPC, SPI,
// I2C, or the socket between QEMU and swtpm) sees the secret only as
// ciphertext.
//
// go-tpm decrypts that parameter in a buffer it allocates and then copies
// it into the response structure; neither copy can be wiped by the caller
// afterwards, and Go's heap keeps freed bytes until they are reused.
// capturingSession therefore takes the plaintext out of go-tpm's buffer as
// it is decrypted, into one buffer the caller owns and wipes, and zeroes
// go-tpm's buffer before go-tpm copies it: the response structure only
// ever holds zeros.
type capturingSession struct {
	tpm2.Session
	plaintext []byte
}

// Decrypt decrypts the response parameter in place, copies it out, and
// zeroes it where go-tpm keeps it.
func (c *capturingSession) Decrypt(parameter []byte) error {
	if err := c.Session.Decrypt(parameter); err != nil {
		return err
	}
	wipe(c.plaintext)
	c.plaintext = make([]byte, len(parameter))
	copy(c.plaintext, parameter)
	wipe(parameter)
	return nil
}

// take returns the captured plaintext; the caller wipes it when done.
func (c *capturingSession) take() []byte {
	p := c.plaintext
	c.plaintext = nil
	return p
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

// encryptedResponse returns a one-use session that encrypts a command's
// response parameter under a key salted to the EK.
func (a *Attester) encryptedResponse() *capturingSession {
	return &capturingSession{Session: tpm2.HMAC(tpm2.TPMAlgSHA256, 16,
		tpm2.Salted(a.ekHandle, a.ekPub),
		tpm2.AESEncryption(128, tpm2.EncryptOut))}
}

// readPublic returns a loaded object's name and public area.
func readPublic(tpm transport.TPM, h tpmutil.Handle) (tpm2.TPM2BName, tpm2.TPMTPublic, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(h)}.Execute(tpm)
	if err != nil {
		return tpm2.TPM2BName{}, tpm2.TPMTPublic{}, err
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return tpm2.TPM2BName{}, tpm2.TPMTPublic{}, err
	}
	return rsp.Name, *pub, nil
}

// ekPolicy is the EK's authorization: the TCG default EK template's
// policy is PolicySecret(TPM_RH_ENDORSEMENT) with the (empty) endorsement
// hierarchy password.
func ekPolicy() tpm2.Session {
	return tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tpm transport.TPM, handle tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{
			AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: handle,
			NonceTPM:      nonceTPM,
		}.Execute(tpm)
		return err
	})
}

// pcrPolicy is a policy session satisfied by the current values of the
// PCRs a blob was sealed to.
func pcrPolicy(sel tpm2.TPMLPCRSelection) tpm2.Session {
	return tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tpm transport.TPM, handle tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicyPCR{PolicySession: handle, Pcrs: sel}.Execute(tpm)
		return err
	})
}

// blobSelection is the PCR selection a blob was sealed to.
func blobSelection(p *pb.PCRs) (tpm2.TPMLPCRSelection, error) {
	if p == nil || len(p.GetPcrs()) == 0 {
		return tpm2.TPMLPCRSelection{}, ErrNoPCRPolicy
	}
	var idx []uint
	for i := range p.GetPcrs() {
		if i > 23 {
			return tpm2.TPMLPCRSelection{}, fmt.Errorf("sealed blob selects PCR %d", i)
		}
		idx = append(idx, uint(i))
	}
	sort.Slice(idx, func(i, j int) bool { return idx[i] < idx[j] })
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgID(p.GetHash()),
		PCRSelect: tpm2.PCClientCompatible.PCRs(idx...),
	}}}, nil
}

// unseal imports a blob under the EK and unseals it with its PCR policy,
// the response encrypted to the EK-salted session.
func (a *Attester) unseal(blob *pb.ImportBlob) ([]byte, error) {
	sel, err := blobSelection(blob.GetPcrs())
	if err != nil {
		return nil, err
	}
	h, name, err := a.load(blob)
	if err != nil {
		return nil, err
	}
	defer legacy.FlushContext(a.rw, h)

	enc := a.encryptedResponse()
	rsp, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{
		Handle: tpm2.TPMHandle(h),
		Name:   name,
		Auth:   pcrPolicy(sel),
	}}.Execute(a.tpm, enc)
	if err != nil {
		wipe(enc.take())
		return nil, fmt.Errorf("unseal: %w", err)
	}
	secret := enc.take()
	if len(secret) != len(rsp.OutData.Buffer) {
		wipe(secret)
		return nil, errors.New("unseal: response was not encrypted")
	}
	return secret, nil
}

// load imports a blob under the EK and loads it. TPM2_Import and TPM2_Load
// carry only what is encrypted to the EK's seed or wrapped by the EK, so
// go-tpm-tools' plain EK policy session does; it is flushed before the
// unseal, which needs two sessions of its own.
func (a *Attester) load(blob *pb.ImportBlob) (tpmutil.Handle, tpm2.TPM2BName, error) {
	var none tpm2.TPM2BName
	ekSess, err := tpmclient.NewEKSession(a.rw)
	if err != nil {
		return 0, none, fmt.Errorf("EK policy session: %w", err)
	}
	defer ekSess.Close()
	auth, err := ekSess.Auth()
	if err != nil {
		return 0, none, fmt.Errorf("EK policy: %w", err)
	}
	private, err := legacy.Import(a.rw, a.ek.Handle(), auth, blob.GetPublicArea(), blob.GetDuplicate(), blob.GetEncryptedSeed(), nil, nil)
	if err != nil {
		return 0, none, fmt.Errorf("import: %w", err)
	}
	if auth, err = ekSess.Auth(); err != nil {
		return 0, none, fmt.Errorf("EK policy: %w", err)
	}
	h, encodedName, err := legacy.LoadUsingAuth(a.rw, a.ek.Handle(), auth, blob.GetPublicArea(), private)
	if err != nil {
		return 0, none, fmt.Errorf("load: %w", err)
	}
	// The name the TPM computed and returned (TPM2B-encoded), not one
	// derived from the blob here: the session HMACs cover it.
	name, err := tpm2.Unmarshal[tpm2.TPM2BName](encodedName)
	if err != nil {
		legacy.FlushContext(a.rw, h)
		return 0, none, fmt.Errorf("name of the loaded blob: %w", err)
	}
	return h, *name, nil
}

// activate runs TPM2_ActivateCredential with the response encrypted to
// the EK-salted session.
func (a *Attester) activate(credBlob, encSecret []byte) ([]byte, error) {
	enc := a.encryptedResponse()
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(a.ak.Handle()), Name: a.akName, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: a.ekHandle, Name: a.ekName, Auth: ekPolicy()},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: credBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encSecret},
	}.Execute(a.tpm, enc)
	if err != nil {
		wipe(enc.take())
		return nil, err
	}
	secret := enc.take()
	if len(secret) != len(rsp.CertInfo.Buffer) {
		wipe(secret)
		return nil, errors.New("activate credential: response was not encrypted")
	}
	return secret, nil
}
