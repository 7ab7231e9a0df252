package broker

// SetNoncesPerAppliance changes b's bound of outstanding nonces per
// appliance (MaxNoncesPerAppliance) until b is closed. Only benchmarks use
// it: their appliances fetch the evidence of every measured round before
// the first one, hundreds of nonces each, because the TPM simulators can
// only be open one at a time.
func SetNoncesPerAppliance(b *Broker, n int) {
	b.nonceM.Lock()
	defer b.nonceM.Unlock()
	b.nonces.perID = n
}
