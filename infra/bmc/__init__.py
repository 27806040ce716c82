"""BMC control: Redfish power, boot override, inventory; secrets resolution."""
